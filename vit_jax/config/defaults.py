"""Every config key of vit_jax, declared once, with its default and meaning.

The runnable configs under the repo's `configs/` start from `get_config()` and change a few
fields. The returned config is locked by the launcher: `--config.KEY=VALUE`
overrides are type-checked and a misspelt key is an error.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the complete default config (a tiny ViT on the bundled digits)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init, data order, augmentation and dropout.

  # Durations are in steps; one step consumes `batch_size` training examples.
  config.batch_size = 128  # Global batch, split over all devices of all processes.
  config.total_steps = 100  # Length of training.
  config.log_every_steps = 10  # Train metrics to console, metrics.jsonl and TensorBoard.
  config.eval_every_steps = 50  # Full pass over the eval split; also run at the end.
  config.checkpoint_every_steps = 50  # Orbax checkpoint of the train state; also at the end.
  config.keep_checkpoints = 3  # How many of the latest checkpoints to keep.
  config.best_metric = 'eval/accuracy'  # Also keep the checkpoint best in this eval metric ('eval/accuracy', 'eval/loss'; with EMA also 'eval_ema/...'), for --step best; '' to disable.
  config.best_mode = 'max'  # Whether the best value of best_metric is the 'max' or the 'min'.
  config.eval_batch_size = 256  # Global eval batch; the last batch is padded and masked.
  config.accumulation_steps = 1  # Micro-batches per step: same update as the full batch, less memory.
  config.cpu_scheduler = 'auto'  # XLA:CPU's scheduler of the train step: 'auto' (the faster default unless its plan would not fit in free host memory, then 'memory'), 'concurrency' or 'memory' (about 30% fewer temporaries, 0-3.5% slower).

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'sklearn_digits'  # Any tfds name; `sklearn_digits` ships with vit_jax.
  config.dataset.data_dir = ''  # tfds data directory; '' means tfds' default (~/tensorflow_datasets or $TFDS_DATA_DIR).
  config.dataset.train_split = 'train'  # tfds split string, e.g. 'train[:98%]'.
  config.dataset.eval_split = 'test'  # tfds split string, e.g. 'train[98%:]' or 'validation'.
  config.dataset.num_classes = 10  # Size of the classifier head.
  config.dataset.image_key = 'image'  # Feature holding the encoded image.
  config.dataset.label_key = 'label'  # Feature holding the integer label.
  config.dataset.manual_dir = ''  # Manually downloaded files (e.g. imagenet2012's tars): an unprepared dataset is prepared from them at start.
  config.dataset.folder = ''  # With name='image_folder': a folder of class sub-folders (optionally split into train/, test/).
  config.dataset.test_fraction = 0.1  # Image folder without train/: fraction of each class held out as 'test' (fixed split).

  config.input = ml_collections.ConfigDict()
  # Images fed to the model: one side (square) or (height, width); any type, so that both
  # --config.input.image_size=384 and --config.input.image_size='(384, 512)' work.
  config.input.image_size = ml_collections.FieldReference(8, field_type=object)
  config.input.max_tokens = 0  # NaFlex: each image resized, aspect ratio kept, to the most patches within this budget, batches padded to it and masked (docs/model.md); image_size then gives only the learned posemb table's grid. 0: every image at image_size.
  config.input.train_crop = 'random_resized'  # 'random_resized' (Inception crop), 'resize' or 'pad_random' (pad then random crop).
  config.input.crop_min_area = 0.08  # Smallest area fraction of an Inception crop.
  config.input.crop_padding = 1  # Pixels of zero padding for 'pad_random'.
  config.input.flip = True  # Random horizontal flips in training.
  config.input.eval_crop_fraction = 1.0  # Eval: resize so that the central crop of this fraction has image_size.
  config.input.normalization = 'value_range'  # 'value_range' (below) or 'mean_std' (per-channel (x/255 - mean) / std).
  config.input.value_range = (-1.0, 1.0)  # Pixel values are mapped to this range, as the published models expect.
  config.input.mean = (0.485, 0.456, 0.406)  # 'mean_std': channel means, in 0..1 units (ImageNet's).
  config.input.std = (0.229, 0.224, 0.225)  # 'mean_std': channel standard deviations, in 0..1 units (ImageNet's).
  config.input.randaugment = ml_collections.ConfigDict()
  config.input.randaugment.num_layers = 0  # RandAugment operations per training image; 0 disables RandAugment.
  config.input.randaugment.magnitude = 10  # RandAugment strength, 0..10 (10 strongest).
  config.input.mixup_alpha = 0.0  # Mixup Beta(alpha, alpha) of neighbouring examples; 0 disables. Labels become soft.
  config.input.cutmix_alpha = 0.0  # CutMix Beta(alpha, alpha) of neighbouring examples; 0 disables. Labels become soft.
  config.input.cutmix_prob = 0.5  # With both mixup and CutMix on: probability that a pair uses CutMix.
  config.input.prefetch = 2  # Batches prepared ahead of the accelerator.
  config.input.threads = 0  # tf.data threads that decode and augment; 0 means one per CPU core (tf.data's default).

  config.model = ml_collections.ConfigDict()
  config.model.variant = 'tiny/2'  # SIZE/PATCH from vit_jax.models.SIZES, e.g. 'B/16'.
  config.model.hidden_size = ml_collections.FieldReference(None, field_type=int)  # Overrides the variant's width.
  config.model.num_layers = ml_collections.FieldReference(None, field_type=int)  # Overrides the variant's depth.
  config.model.mlp_dim = ml_collections.FieldReference(None, field_type=int)  # Overrides the variant's MLP width.
  config.model.num_heads = ml_collections.FieldReference(None, field_type=int)  # Overrides the variant's heads.
  config.model.pool = 'token'  # 'token' (class token), 'gap' (mean of patch tokens) or 'map' (attention-pooling head).
  config.model.posemb = 'learn'  # 'learn', 'sincos2d', 'none', 2-D RoPE 'rope_axial' or 'rope_mixed' (learned frequencies), or both as 'learn+rope_axial', 'learn+rope_mixed', 'sincos2d+rope_...'.
  config.model.representation_size = ml_collections.FieldReference(None, field_type=int)  # Pre-logits layer width; None for none.
  config.model.dropout_rate = 0.0  # Dropout after attention, in the MLP and on embeddings.
  config.model.attention_dropout_rate = 0.0  # Dropout on attention weights.
  config.model.stochastic_depth = 0.0  # Drop-path rate of the last block (linear from 0 at the first).
  config.model.dtype = 'float32'  # Computation dtype ('float32' or 'bfloat16'); parameters stay float32.
  config.model.attention = 'fused'  # Chosen per platform by vit_jax/training/platform.py: 'fused' (CPU's backward rule on CPU, cuDNN flash attention on GPU where JAX's cuDNN path takes it, else XLA), 'xla' (the same, never cuDNN) or 'reference' (explicit softmax, plain autodiff everywhere).
  config.model.gelu = 'tanh'  # 'tanh' (flax nn.gelu, as the published ViT checkpoints were trained) or 'exact' (erf, as timm/PyTorch).
  config.model.num_registers = 0  # Learned register tokens after the class token (Darcet et al. 2023); 0 for none.
  config.model.qk_norm = False  # LayerNorm on queries and keys per head before the dot product (ViT-22B).
  config.model.layerscale = ml_collections.FieldReference(None, field_type=float)  # Initial LayerScale of residual branches (e.g. 1e-4); None for none.
  config.model.remat = ml_collections.FieldReference(False, field_type=object)  # Recompute block activations in the backward pass: False/'none', True/'full' (least memory, ~30% more compute), or a jax.checkpoint_policies name ('dots_saveable', 'dots_with_no_batch_dims_saveable', 'nothing_saveable').
  config.model.scan = False  # One nn.scan over the blocks: compile time independent of depth (params stacked per layer).
  config.model.patch_sizes = ()  # FlexiViT: e.g. (2, 4, 8); each train step draws one (from the seed and step) and PI-resizes the variant's patch embedding and position embeddings to it; () trains at the variant's patch size only.
  config.model.patch_dropout = 0.0  # Token dropping: share of patch tokens each training image drops at random (never the class token or registers; none at evaluation); 0 disables.

  # Fine-tuning: start from pretrained parameters instead of a random init (only
  # when the workdir has no checkpoint yet; a later run resumes as usual).
  config.init = ml_collections.ConfigDict()
  config.init.path = ''  # '' (random init); a .npz path, URL or published name (imagenet21k/ViT-B_16, augreg:B/16: docs/transfer.md); or an orbax workdir / step dir.
  config.init.reset_head = True  # Zero `head` for config.dataset.num_classes; False loads it (shapes must match).

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adamw'  # 'adamw', 'sgd' (with momentum) or 'muon' (Muon for the encoder's matrices, AdamW for the rest).
  config.optimizer.learning_rate = 1e-3  # Peak learning rate, reached after warm-up.
  config.optimizer.schedule = 'cosine'  # Decay after warm-up: 'cosine', 'linear' or 'constant'.
  config.optimizer.warmup_steps = 10  # Linear warm-up from 0 to the peak.
  config.optimizer.end_learning_rate = 0.0  # Learning rate at the last step ('cosine'/'linear').
  config.optimizer.weight_decay = 1e-4  # Decoupled weight decay (AdamW) / L2 via optax (SGD); biases, norms and embeddings excluded.
  config.optimizer.b1 = 0.9  # Adam beta1.
  config.optimizer.b2 = 0.999  # Adam beta2.
  config.optimizer.momentum = 0.9  # SGD momentum.
  config.optimizer.grad_clip_norm = 1.0  # Clip gradients to this global norm; 0 disables.
  config.optimizer.label_smoothing = 0.0  # Label smoothing of the cross-entropy targets.
  config.optimizer.muon_beta = 0.95  # Muon's (Nesterov) momentum.
  config.optimizer.muon_ns_steps = 5  # Muon's Newton-Schulz iterations.
  config.optimizer.muon_consistent_rms = 0.2  # Muon's updates scaled to this RMS (Liu et al. 2025) so that AdamW's learning rate and weight decay fit them; 0: Keller Jordan's sqrt(max(1, fan_out / fan_in)) (which wants a larger learning rate).
  config.optimizer.freeze = ''  # Regex searched in parameter paths ('Transformer/encoderblock_0/...', 'head/kernel'): matches are frozen, with no optimizer state. '^(?!head/)' = linear probe; '' trains all.

  # Exponential moving average (Polyak averaging) of the parameters, kept in
  # the train state and checkpointed; evaluated as eval_ema/... beside eval/...
  config.ema = ml_collections.ConfigDict()
  config.ema.decay = 0.0  # ema = decay * ema + (1 - decay) * params after every step, e.g. 0.9999; 0 disables EMA.
  config.ema.warmup = False  # Use min(decay, (1 + step) / (10 + step)): early averages forget the random init fast.

  # Few-shot linear evaluation during training (vit_jax/training/fewshot.py):
  # a closed-form ridge classifier on frozen pre-logits, written as
  # fewshot/<name>/<k>shot (mean accuracy over the seeds).
  config.fewshot = ml_collections.ConfigDict()
  config.fewshot.every_steps = 0  # Run every this many steps and at the end; 0 disables.
  config.fewshot.datasets = ml_collections.ConfigDict()  # name -> (tfds name or image folder, train split, test split), e.g. {'digits': ('sklearn_digits', 'train', 'test')}.
  config.fewshot.shots = (1, 5, 10, 25)  # Training examples per class.
  config.fewshot.seeds = 3  # Random draws of the shots, averaged.
  config.fewshot.l2_reg = 2.0**10  # Ridge penalty on the standardised features (big_vision's default).

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Devices on the data-parallel axis; -1 means all the others.
  config.mesh.fsdp = 1  # Devices that split parameters and optimizer state (FSDP); -1 means all the others.
  config.mesh.fsdp_min_size = 2**14  # Arrays with fewer elements stay replicated under FSDP.
  return config
