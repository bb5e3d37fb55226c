"""Build pyublk_fast: Cython extensions linked against Debian's liburing.

Developer builds (PYUBLK_DEV=1) turn C and Cython warnings into errors;
released builds stay lenient. No -march=native: wheels must run anywhere.
"""
import glob
import os

import numpy
from Cython.Build import cythonize
from Cython.Compiler import Options as CythonOptions
from setuptools import Extension, find_packages, setup

DEV = os.environ.get("PYUBLK_DEV") == "1"
CFLAGS = ["-O2", "-Wno-unused-function"]
#: Cython and the C compiler run on every CPU (the modules are independent).
JOBS = len(os.sched_getaffinity(0))
if DEV:
    CFLAGS += ["-Werror", "-Wall", "-Wno-unreachable-code"]
    CythonOptions.warning_errors = True


#: The VM lane's checkouts link pyublk_fast/backends to backends/: those modules are
#: built (and packaged) once, from backends/.
LINKED_BACKENDS = "pyublk_fast/backends/"


#: Native backends that link a system library, by module: (libraries, a header that must
#: exist, the Debian packages providing it). Without the header the module is skipped
#: (its backend then says what to install) so the rest still builds.
SYSTEM_LIBS = {
    "pyublk_fast.backends._native_rbd": (["rbd", "rados"], "/usr/include/rbd/librbd.h",
                                         "librbd-dev librados-dev"),
}


def ext(module: str) -> Extension:
    path = module.replace(".", "/") + ".pyx"
    if module.startswith("pyublk_fast.backends."):
        path = "backends/" + module.split(".", 2)[2].replace(".", "/") + ".pyx"
    return Extension(
        module,
        [path],
        include_dirs=[numpy.get_include(), "pyublk_fast/_core"],
        libraries=["uring"] + SYSTEM_LIBS.get(module, ([],))[0],
        extra_compile_args=CFLAGS,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


def modules() -> list[str]:
    found = []
    for path in sorted(glob.glob("pyublk_fast/**/*.pyx", recursive=True)):
        if not path.startswith(LINKED_BACKENDS):
            found.append(path[:-4].replace("/", "."))
    for path in sorted(glob.glob("backends/**/*.pyx", recursive=True)):
        module = "pyublk_fast.backends." + path[len("backends/"):-4].replace("/", ".")
        if module in SYSTEM_LIBS and not os.path.exists(SYSTEM_LIBS[module][1]):
            print(f"setup.py: skipping {module}: {SYSTEM_LIBS[module][1]} is missing "
                  f"(apt-get install {SYSTEM_LIBS[module][2]})")
            continue
        found.append(module)
    if not found:   # e.g. an sdist that lost its sources: never build a wheel without its C half
        raise SystemExit("setup.py: no .pyx sources under pyublk_fast/ or backends/")
    return found


packages = find_packages(include=["pyublk_fast", "pyublk_fast.*"],
                         exclude=["pyublk_fast.backends", "pyublk_fast.backends.*"])
packages += ["pyublk_fast.backends"] + [
    "pyublk_fast.backends." + p for p in find_packages(where="backends")
]

setup(
    packages=packages,
    package_dir={"pyublk_fast.backends": "backends"},
    # data/*.rules: the udev rules; .pxd/.h: what a native target written elsewhere cimports; .pyi + py.typed: types
    # for mypy and editors; nop_qd.c: the bench compiles its NOP reference from it
    package_data={"pyublk_fast": ["py.typed", "*.pyi", "data/*.rules"],
                  "pyublk_fast._core": ["*.pxd", "*.h", "*.pyi"],
                  "pyublk_fast.transport.sim": ["*.pxd"],
                  "pyublk_fast.backends": ["*.pxd"],
                  "pyublk_fast.bench": ["nop_qd.c"]},
    include_package_data=False,   # exactly the files above: no .pyx or generated .c in the wheel
    ext_modules=cythonize(
        [ext(m) for m in modules()],
        # signatures in the docstrings (for help() and the API reference) in Python's
        # notation; this only writes docstrings, the generated code is the same
        compiler_directives={"language_level": "3", "embedsignature": True,
                             "embedsignature.format": "python"},
        include_path=["."],
        nthreads=JOBS,
    ),
    options={"build_ext": {"parallel": JOBS}},
    zip_safe=False,
)
