"""Class-conditional quickstart: the built-in faces labelled by hair colour (black, blonde,
blue), 32x32, classifier-free guidance. About 10 minutes on 2 CPU cores.

  python main.py --config configs/faces_by_hair.py --workdir runs/hair
  python main.py --mode=sample --workdir runs/hair --config.sampling.labels=blue
  python main.py --mode=inpaint --workdir runs/hair --config.sampling.inputs=DIR

The reference run of docs/results.md ("Guidance, inpainting and image-to-image").
"""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.data.dataset = "cartoon_faces/hair"
  config.model.num_classes = 3  # black, blonde, blue
  # Epsilon, as when docs/results.md's guidance numbers were measured (the quickstart itself
  # now predicts v; see configs/quickstart.py).
  config.model.prediction_type = "epsilon"
  config.training.label_dropout = 0.1  # 10% of labels dropped: the unconditional model
  config.training.sample_every_steps = 500  # grids show each class in turn
  config.sampling.guidance_scale = 3.0
  config.sampling.labels = "all"
  return config
