"""Print the folders holding cupti_activity.h and cuda_runtime_api.h, for CMakeLists.txt.

Looked for in the pip wheels first (nvidia-cuda-cupti-cu12 / nvidia-cuda-runtime-cu12:
nvidia/cuda_cupti, nvidia/cuda_runtime; the CUDA 13 wheels: nvidia/cu13), then in a
CUDA toolkit (CUDA_HOME, /usr/local/cuda*). Prints two lines (CUPTI, runtime); an empty
line where nothing was found.
"""
import glob
import os
import sys


def candidates():
    roots = []
    for entry in sys.path:
        roots += sorted(glob.glob(os.path.join(entry or ".", "nvidia", "*", "include")))
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                 *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if home:
            roots += [os.path.join(home, "include"), os.path.join(home, "extras", "CUPTI", "include")]
    return roots


def first(name):
    for folder in candidates():
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.abspath(folder)
    return ""


if __name__ == "__main__":
    print(os.environ.get("KVPROF_CUPTI_INCLUDE") or first("cupti_activity.h"))
    print(os.environ.get("KVPROF_CUDA_INCLUDE") or first("cuda_runtime_api.h"))
