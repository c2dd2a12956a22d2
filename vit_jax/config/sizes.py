"""Image sizes in configs: `config.input.image_size` is one side or (height, width)."""

from typing import Union

import numpy as np


def image_hw(image_size: Union[int, tuple[int, int], list[int]]) -> tuple[int, int]:
  """`config.input.image_size` (one side, or (height, width)) -> (height, width).

  Raises ValueError for anything but one or two positive integers.
  """
  if isinstance(image_size, str):  # A command-line override such as '(384, 512)' or '384,512'.
    parts = image_size.strip().strip('()[]').replace('x', ',').split(',')
    try:
      image_size = tuple(int(p) for p in parts if p.strip())
    except ValueError:
      raise ValueError(f'image_size {image_size!r} is not one or two integers; write 384 or '
                       '(384, 512) for height 384, width 512.') from None
  if isinstance(image_size, (tuple, list)) and len(image_size) == 1:
    image_size = image_size[0]
  if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
    hw = (int(image_size), int(image_size))
  elif (isinstance(image_size, (tuple, list)) and len(image_size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size)):
    hw = (int(image_size[0]), int(image_size[1]))
  else:
    raise ValueError(f'image_size {image_size!r} is not one or two integers; write 384 or '
                     '(384, 512) for height 384, width 512.')
  if min(hw) < 1:
    raise ValueError(f'image_size {image_size!r} has a side below 1; use positive sizes.')
  return hw
