"""What the side-by-side benchmarks print about the two frameworks they run."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_info


def framework_info(framework: str) -> str:
    """'torch 2.13.0, at::get_num_threads() : 2' or 'NumPy 2.4.6, BLAS openblas 0.3.31 kernel=Haswell'."""
    if framework == "torch":
        import torch

        return f"torch {torch.__version__}, {torch.__config__.parallel_info().splitlines()[1].strip()}"
    blas = [
        f"{i['internal_api']} {i['version']} kernel={i.get('architecture')}"
        for i in threadpool_info()
        if i["user_api"] == "blas"
    ]
    return f"NumPy {np.__version__}, BLAS {'; '.join(blas)}"
