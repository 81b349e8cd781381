"""Shared pytest setup: one intra-op thread, so test results and timings do not depend on OMP_NUM_THREADS or on
the number of cores of the machine running them."""

import torch

torch.set_num_threads(1)
