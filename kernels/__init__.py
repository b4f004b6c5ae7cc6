"""Backend kernels, installed as `seqfast.kernels`: one module per backend, all on the contract of `reference`."""
