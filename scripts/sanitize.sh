#!/usr/bin/env bash
# Build the kernels with AddressSanitizer + UndefinedBehaviorSanitizer in a scratch
# copy of the source tree and run the test suite against that build.
#
#   scripts/sanitize.sh                    # all kernel paths, the default test selection
#   SANITIZE_BASELINE_ONLY=1 scripts/sanitize.sh          # one kernel path: faster build
#   scripts/sanitize.sh tests/test_hostile.py -x          # arguments go to pytest
#
# Needs gcc (with libasan/libubsan), and a Python with numpy, Cython, pytest and
# hypothesis ($PYTHON, default: python3). Nothing is installed and the working tree
# is not touched: the build happens in a temporary directory, removed at the end
# (SANITIZE_KEEP=1 keeps it).
#
# How: CC="gcc -fsanitize=address,undefined ..." so that every compile and link
# setup.py makes gets the flags -- the extension modules and also its probe programs
# (OpenMP, ISA levels), whose links would fail without the sanitizer runtimes. The
# Python interpreter itself is not instrumented, so the ASan runtime must be the
# first library loaded: LD_PRELOAD=libasan.so (then libstdc++). detect_leaks=0 because CPython frees
# little at exit by design (those "leaks" are not ours). PYTHONMALLOC=malloc routes
# Python's small objects through malloc too. Reports go to files (pytest captures the
# tests' stderr, and a report is followed by an abort); any report fails the run.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
cc="${CC:-gcc}"

libasan="$("$cc" -print-file-name=libasan.so)"
if [ ! -e "$libasan" ]; then
    echo "sanitize.sh: $cc has no libasan.so ($libasan); install gcc's sanitizer runtimes" >&2
    exit 2
fi
libasan="$(readlink -f "$libasan")"
# C++ extensions that throw (matplotlib's pybind11 modules, used by the demo tests)
# need the C++ runtime loaded when ASan starts, or ASan's __cxa_throw hook is null
libstdcxx="$(readlink -f "$("$cc" -print-file-name=libstdc++.so)")"

work="$(mktemp -d "${TMPDIR:-/tmp}/fastoptim-sanitize.XXXXXX")"
cleanup() { if [ -z "${SANITIZE_KEEP:-}" ]; then rm -rf "$work"; else echo "kept: $work"; fi; }
trap cleanup EXIT

# the sources (tracked and new files, no build products) into the scratch tree
if git -C "$here" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$here" && git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$work")
else
    (cd "$here" && tar --exclude=build --exclude='*.so' --exclude='fastoptim/_kernels_*.c' \
        -cf - .) | (cd "$work" && tar -xf -)
fi
rm -f "$work"/fastoptim/*.so "$work"/fastoptim/_kernels_*.c

san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
echo "== building with $cc $san ($($cc --version | head -1))"
(
    cd "$work"
    CC="$cc $san" LDSHARED="$cc $san -shared" \
    FASTOPTIM_BASELINE_ONLY="${SANITIZE_BASELINE_ONLY:-}" \
        "$python" setup.py build_ext --inplace >"$work/build.log" 2>&1
) || { echo "sanitize.sh: build failed, see the log:" >&2; tail -40 "$work/build.log" >&2; exit 2; }
if grep -q "WITHOUT OpenMP" "$work/build.log"; then
    echo "sanitize.sh: the instrumented build has no OpenMP (probe failed); see $work/build.log" >&2
    SANITIZE_KEEP=1
    exit 2
fi
for so in "$work"/fastoptim/_kernels_*.so; do
    if ! nm -D "$so" 2>/dev/null | grep __asan_ >/dev/null; then   # (no -q: SIGPIPE)
        echo "sanitize.sh: $so is not instrumented" >&2
        exit 2
    fi
    echo "   instrumented: $(basename "$so")"
done

if [ "$#" -eq 0 ]; then
    # every test of the kernels and what calls them; the packaging tests (wheel,
    # mypy) build or type-check instead of running kernels, and torch is left out
    # (its own libraries are not built for a preloaded ASan runtime)
    set -- tests -p no:cacheprovider --ignore=tests/test_wheel.py \
        --ignore=tests/test_typing.py -k "not torch"
fi
mkdir -p "$work/reports"

echo "== running: pytest $*"
set +e
(
    cd "$work"
    export LD_PRELOAD="$libasan $libstdcxx"
    export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1:check_initialization_order=1:log_path=$work/reports/asan"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$work/reports/ubsan"
    export PYTHONMALLOC=malloc
    export PYTHONPATH="$work"
    export FASTOPTIM_SANITIZED=1
    "$python" -c "import fastoptim; fastoptim.show_config()" &&
    "$python" -m pytest "$@"
) 2>&1 | tee "$work/test.log"
status=${PIPESTATUS[0]}
set -e

if compgen -G "$work/reports/*" >/dev/null; then
    for report in "$work"/reports/*; do
        echo "== $(basename "$report"):"
        cat "$report"
    done
    echo "== sanitize.sh: the sanitizers reported errors (above)"
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "== sanitize.sh: pytest failed (exit $status) under the sanitizers"
    exit "$status"
fi
echo "== sanitize.sh: clean (AddressSanitizer + UndefinedBehaviorSanitizer, no reports)"
