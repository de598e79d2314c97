"""Build and install rectok_fast.

    pip install --no-build-isolation -e .

Builds the C++ extension ``rectok_fast._C`` (csrc/, CPU path) always, and adds its CUDA kernels
when torch is a CUDA build and nvcc is found. Switches:
  RECTOK_FAST_SKIP_CUDA=1   build the C++ (CPU) path only
  RECTOK_FAST_SKIP_EXT=1    build no extension at all (the reference ops are used)
  TORCH_CUDA_ARCH_LIST      GPU architectures (default 9.0 = H100/H200; no GPU is needed to build)
  CUDA_HOME                 CUDA toolkit (default /usr/local/cuda when it exists)
"""
import glob
import os

# Both must be set before torch.utils.cpp_extension is imported: it computes CUDA_HOME at import,
# and with no GPU to query it cannot pick an architecture.
if os.path.isdir("/usr/local/cuda"):
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

from setuptools import setup  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def _extensions():
    if _flag("RECTOK_FAST_SKIP_EXT"):
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # No -std flag: torch's BuildExtension adds the C++ standard its headers need (C++20 for torch 2.14).
    cxx = ["-O3"]
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    want_cuda = (bool(cu) and not _flag("RECTOK_FAST_SKIP_CUDA") and torch.version.cuda is not None
                 and CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if want_cuda:
        site = os.path.dirname(os.path.dirname(torch.__file__))
        # torch's CUDA headers include cusparse.h / cublas_v2.h, which live in torch's nvidia wheels.
        inc = [p for p in glob.glob(os.path.join(site, "nvidia", "cu1*", "include")) if os.path.isdir(p)]
        ext = CUDAExtension(
            "rectok_fast._C", cpp + cu, include_dirs=inc,
            define_macros=[("RECTOK_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx + ["-fopenmp"],
                                "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                                         "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                                         "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("rectok_fast._C", cpp, extra_compile_args=cxx + ["-fopenmp"], extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="rectok_fast",
    version="0.1.0",
    description="Fast, drop-in training stack for RecTok (Reconstruction Distillation along Rectified Flow)",
    packages=["rectok_fast", "rectok_fast.data", "rectok_fast.ops", "rectok_fast.models", "rectok_fast.training",
              "rectok_fast.training.stages", "rectok_fast.evaluation",
              "rectok_fast.kernels"],
    package_dir={"rectok_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1", "torchvision==0.29.1", "numpy", "timm==1.0.31", "einops", "pillow",
        "scikit-image", "tqdm", "safetensors", "torch-fidelity==0.4.0",
    ],
    extras_require={
        "train": ["deepspeed==0.19.8", "nvidia-dali-cuda130==2.4.0", "tensorboard", "matplotlib"],
        "test": ["pytest", "pytest-benchmark"],
    },
    entry_points={"console_scripts": [
        "rectok-sample=rectok_fast.sample:main",
        "rectok-train=rectok_fast.train:cli",
        "rectok-env-report=rectok_fast.env_report:main",
        "rectok-eval=rectok_fast.evaluate:main",
    ]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
