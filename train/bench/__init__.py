"""Training-step throughput of the seed config against the seed's PyTorch, and large codebooks.

    python -m train.bench --out benchmarks/cpu.json --markdown benchmarks/cpu.md
    python -m train.bench --batch_sizes=256 --dtypes=float32 --quantizers=ema --steps=5
    python -m train.bench --steps_per_dispatch=1,20 --out benchmarks/gpu.json  # on a GPU

For each quantizer (EMA 0.99 and plain), batch size and dtype it times the jit-compiled step of
`train.step` (`create_train_state`, `make_train_step`, `jax.jit(..., donate_argnums=0)`) after
compilation, and on the same device and batch the seed's PyTorch model (eager and
`torch.compile`) when torch is installed, on the GPU when torch sees one, in the same dtype:
float32 is the seed as written (with PyTorch's default TF32 convolutions on GPUs), bfloat16 is the
seed under `torch.autocast(dtype=torch.bfloat16)`, PyTorch's mixed precision (float32 parameters
and optimizer, bfloat16 convolutions and matmuls). Ratios compare the same dtype. It reports
images/s, peak memory, XLA's FLOP count and the fraction of the device's peak, then times
`nearest_code` with a 65,536-code codebook.

`--steps_per_dispatch=k` also times the trainer's way of running: `k` optimizer steps in one
`lax.scan` per jit call, which removes the per-step Python and launch overhead that bounds a model
this small on an accelerator. The report is rewritten after each configuration, so an interrupted
run keeps what it measured.

  * `__main__`: the flags and the order of the runs.
  * `jax_side`: the JAX training step, its FLOPs and memory, and the large-codebook search.
  * `torch_side`: the seed's PyTorch training step, eager and `torch.compile`d.
  * `measure`: what one measurement holds, interleaved timing and peak memory.
  * `device`: the device's description and peak FLOP/s.
  * `report`: ratios, the JSON report and its markdown tables.

Results and how they were obtained: benchmarks/ and docs/performance.md.
"""

# The seed config: Model(128, 2, 32, 512, 64, 0.25, decay), Adam 3e-4, 32x32x3 images.
SEED_MODEL = dict(num_hiddens=128, num_residual_layers=2, num_residual_hiddens=32,
                  num_embeddings=512, embedding_dim=64, commitment_cost=0.25)
DECAYS = {'ema': 0.99, 'plain': 0.0}
LEARNING_RATE = 3e-4
IMAGE_SIZE = 32
DATA_VARIANCE = 0.06327  # CIFAR-10's, as in the seed's notebook; it does not change the speed.
