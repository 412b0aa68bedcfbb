"""Regenerates the golden values that tests/test_seed_parity.py compares against.

Runs the seed's own PyTorch code (`seed_torch.py`, a verbatim copy of the seed) on a small
config and saves its inputs, weights and outputs to `seed_golden_{plain,ema}.npz`. Torch is
needed here only; the tests read the .npz files.

    pip install torch==2.13.0
    python tests/golden/make_golden.py
"""

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import seed_torch  # noqa: E402

CONFIG = dict(num_hiddens=32, num_residual_layers=2, num_residual_hiddens=8,
              num_embeddings=64, embedding_dim=16, commitment_cost=0.25)
BATCH, SIZE, TRAIN_STEPS, LEARNING_RATE, DATA_VARIANCE = 8, 16, 3, 3e-4, 0.06327


def state_dict_numpy(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def to_nhwc(x):
  return x.detach().numpy().transpose(0, 2, 3, 1).copy()


def quantizer_golden(decay, rng):
  """The seed's quantizer alone, on spread-out inputs that use many codes, with gradients."""
  k, d = CONFIG['num_embeddings'], CONFIG['embedding_dim']
  if decay > 0:
    vq = seed_torch.VectorQuantizerEMA(k, d, CONFIG['commitment_cost'], decay)
  else:
    vq = seed_torch.VectorQuantizer(k, d, CONFIG['commitment_cost'])
    vq._embedding.weight.data.normal_()  # spread the codes, so many are used
  out = {f'vq_init/{n}': v.detach().numpy().copy() for n, v in vq.state_dict().items()}
  vq.train()
  for call in range(2):
    z = torch.from_numpy(rng.normal(size=(4, d, 5, 3)).astype(np.float32)).requires_grad_()
    cotangent = torch.from_numpy(rng.normal(size=(4, d, 5, 3)).astype(np.float32))
    weight = vq._embedding.weight
    weight.grad = None
    loss, quantized, perplexity, encodings = vq(z)
    (loss + (quantized * cotangent).sum()).backward()
    out[f'vq{call}/inputs'] = to_nhwc(z)
    out[f'vq{call}/cotangent'] = to_nhwc(cotangent)
    out[f'vq{call}/loss'] = np.float32(loss.item())
    out[f'vq{call}/quantized'] = to_nhwc(quantized)
    out[f'vq{call}/perplexity'] = np.float32(perplexity.item())
    out[f'vq{call}/indices'] = encodings.argmax(1).numpy().reshape(4, 5, 3)
    out[f'vq{call}/grad_inputs'] = to_nhwc(z.grad)
    if weight.grad is not None:
      out[f'vq{call}/grad_embedding'] = weight.grad.numpy().copy()
    for n, v in vq.state_dict().items():
      out[f'vq{call}_after/{n}'] = v.detach().numpy().copy()
  return out


def main():
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  # Smooth random images in [-0.5, 0.5], so codes are not all equidistant.
  base = rng.uniform(-0.5, 0.5, size=(TRAIN_STEPS + 1, BATCH, 3, SIZE // 4, SIZE // 4))
  images = np.repeat(np.repeat(base, 4, axis=-1), 4, axis=-2)
  images = (images + 0.1 * rng.normal(size=images.shape)).clip(-0.5, 0.5).astype(np.float32)

  for name, decay in (('plain', 0.0), ('ema', 0.99)):
    model = seed_torch.Model(**CONFIG, decay=decay)
    out = {'images': images.transpose(0, 1, 3, 4, 2).copy()}  # NHWC
    for k, v in state_dict_numpy(model).items():
      out['init/' + k] = v
    x0 = torch.from_numpy(images[0])

    model.eval()
    with torch.no_grad():
      loss, recon, perplexity = model(x0.clone())
      _, quantized, _, encodings = model._vq_vae(model._pre_vq_conv(model._encoder(x0.clone())))
    out['eval/recon'] = to_nhwc(recon)
    out['eval/loss'] = np.float32(loss.item())
    out['eval/perplexity'] = np.float32(perplexity.item())
    out['eval/indices'] = encodings.argmax(1).numpy().reshape(BATCH, SIZE // 4, SIZE // 4)
    out['eval/quantized'] = to_nhwc(quantized)

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    losses = []
    for step in range(TRAIN_STEPS):
      x = torch.from_numpy(images[step])
      optimizer.zero_grad()
      vq_loss, recon, perplexity = model(x)
      loss = F.mse_loss(recon, x) / DATA_VARIANCE + vq_loss
      loss.backward()
      optimizer.step()
      losses.append([loss.item(), vq_loss.item(), perplexity.item()])
      if step == 0:
        for k, v in state_dict_numpy(model).items():
          out['step1/' + k] = v
    out['train/losses'] = np.asarray(losses, np.float32)
    for k, v in state_dict_numpy(model).items():
      out['final/' + k] = v
    model.eval()
    with torch.no_grad():
      loss, recon, perplexity = model(torch.from_numpy(images[TRAIN_STEPS]))
    out['final_eval/recon'] = to_nhwc(recon)
    out['final_eval/loss'] = np.float32(loss.item())
    out['final_eval/perplexity'] = np.float32(perplexity.item())
    out.update(quantizer_golden(decay, rng))
    path = os.path.join(HERE, f'seed_golden_{name}.npz')
    np.savez_compressed(path, **out)
    print('wrote', path, 'losses', losses)


if __name__ == '__main__':
  main()
