"""Builds the C++/CUDA extension ``t2t_kernels._C`` with torch.utils.cpp_extension.

Environment switches (all optional):
  T2T_BUILD_EXT=0        build no extension at all (the package then runs on its eager/Triton paths)
  T2T_FORCE_CUDA=1|0     force the CUDA sources on or off (default: on when torch is a CUDA build and nvcc is found)
  T2T_CUDA_ARCH_LIST     semicolon list of compute capabilities, "+PTX" adds PTX for that one (default "8.0;9.0+PTX")
  NVCC_FLAGS             extra flags for nvcc
  DEBUG=1                -O0 -g instead of -O3
  MAX_JOBS               parallel compile jobs (default: from cores and memory)
  CUDA_HOME              CUDA toolkit; when unset and the one derived from nvcc has no libcudart, /usr/local/cuda
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_HOME = "/usr/local/cuda"  # the toolkit's standard install location


def _has_cudart(home):
    return any(glob.glob(os.path.join(home, lib, "libcudart.so*")) for lib in ("lib64", "lib", "targets/*/lib"))


def _pick_cuda_home():
    """torch derives CUDA_HOME from `which nvcc`; a symlinked nvcc gives a root without libcudart, which fails to link."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    derived = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    for home in (derived, DEFAULT_CUDA_HOME):
        if home and _has_cudart(home):
            os.environ["CUDA_HOME"] = home
            return


def _env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() not in ("0", "false", "no", "off")


def _gencode_flags(arch_list):
    flags = []
    for arch in filter(None, (a.strip() for a in arch_list.replace(",", ";").split(";"))):
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _default_max_jobs():
    # nvcc takes ~2 GB per job; leave memory for the rest of the machine
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gb // 4))))


def extensions():
    if _env_flag("T2T_BUILD_EXT") is False:
        print("t2t_kernels build: T2T_BUILD_EXT=0, building no extension")
        return [], {}
    _pick_cuda_home()
    import torch
    from torch.utils import cpp_extension

    force_cuda = _env_flag("T2T_FORCE_CUDA")
    nvcc_found = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    with_cuda = bool(torch.version.cuda) and nvcc_found if force_cuda is None else force_cuda
    debug = _env_flag("DEBUG") is True
    arch_list = os.environ.get("T2T_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())

    sources = ["csrc/ops.cpp", "csrc/recompute.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    # -fopenmp: ATen's parallel_for is an inline `#pragma omp parallel` (torch's backend is OpenMP); without the
    # flag it compiles to a serial loop. The link flag resolves to the libgomp that torch already loaded.
    cxx_flags = (["-O0", "-g"] if debug else ["-O3"]) + ["-fopenmp"]
    extra = {"cxx": cxx_flags + ["-DPy_LIMITED_API=0x03090000"]}
    link_args = ["-fopenmp"]
    ext_cls = cpp_extension.CppExtension
    define_macros = []
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
        extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math"]) + _gencode_flags(arch_list)
        extra["nvcc"] += os.environ.get("NVCC_FLAGS", "").split()
        ext_cls = cpp_extension.CUDAExtension
        define_macros.append(("T2T_WITH_CUDA", None))

    print(
        "t2t_kernels build configuration:\n"
        f"  torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={cpp_extension.CUDA_HOME}\n"
        f"  cuda sources: {with_cuda} (T2T_FORCE_CUDA={os.environ.get('T2T_FORCE_CUDA')}, nvcc found: {nvcc_found})\n"
        f"  arch list: {arch_list if with_cuda else '-'}; debug: {debug}; MAX_JOBS={os.environ['MAX_JOBS']}\n"
        f"  sources: {' '.join(sources)}"
    )
    ext = ext_cls(
        "t2t_kernels._C",
        sources,
        extra_compile_args=extra,
        define_macros=define_macros,
        extra_link_args=link_args,
        py_limited_api=True,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
