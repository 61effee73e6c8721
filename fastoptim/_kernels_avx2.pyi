# The avx2 build of fastoptim/_kernels.pxi: the same API as the baseline build.
from fastoptim._kernels_baseline import *
from fastoptim._kernels_baseline import Step as Step
from fastoptim._kernels_baseline import AdafactorStep as AdafactorStep
