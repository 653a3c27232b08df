"""Shared test setup: no network, one thread per process; tests build tiny models themselves.

The environment is set here, before any test module imports torch, transformers or datasets.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"

# Tests never read or fill the user's cache (~/.cache/meshtrain); the corpus and tokenizer are
# built once per test session here (a few seconds).
if "MESHTRAIN_TEST_CACHE" not in os.environ:
    import tempfile

    os.environ["MESHTRAIN_TEST_CACHE"] = tempfile.mkdtemp(prefix="meshtrain-test-cache-")
os.environ["MESHTRAIN_CACHE"] = os.environ["MESHTRAIN_TEST_CACHE"]
os.environ.setdefault("MESHTRAIN_PEAK_FLOPS", "1e11")  # skip the matmul measurement
os.environ.setdefault("MESHTRAIN_PEAK_FLOPS_BF16", "1e11")
# train.precision = "auto" means fp32 in tests, on any CPU: parity is an fp32 promise.
os.environ.setdefault("MESHTRAIN_PRECISION", "fp32")
