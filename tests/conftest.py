"""Suite-wide settings."""

import torch

# pytest -n 2 runs two workers on two cores: a second intra-op thread per worker only adds
# OpenMP spin-waiting (a 28×28 CNN step measured 10× slower with two threads under load).
torch.set_num_threads(1)
