"""Paper defaults (Moriya et al., SPIE MI 2018; JULE, CVPR 2016).

Every number of docs/method.md lives here (the code cites its sections as "method §N").

Experiment configs import this module and change only what differs. This file is not meant to be
run by itself: it has no volume path. See configs/lung_c.py for the paper run and configs/demo.py
for a CPU-sized run on the built-in phantom.
"""

import ml_collections

# Fields an earlier version of jule3d had under another name: old -> new (named in the error a
# command line with the old name gets).
RENAMED = {'segment.batch_size': 'model.feature_batch_size'}


def get_config() -> ml_collections.ConfigDict:
  """Returns the paper's default configuration (no data path set)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # One seed drives sampling, init, batching and k-means: same seed -> same labels.

  # --- Input volume (method §1) -------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  # Volume: zarr/N5 dir, tensorstore JSON spec, .nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd, a folder of
  # one DICOM series, .tif/.tiff, TIFF folder, .npy.
  c.data.path = ''
  c.data.labels = ''  # Optional reference labels (0 = not annotated), any supported format.
  # Foreground intensity threshold in the volume's raw units, or 'otsu': derived from the image's
  # histogram (skimage's threshold_otsu), logged and recorded in report.json with the foreground
  # fraction. Typed `object` so that a number and 'otsu' are both accepted (file and command line).
  c.data.threshold = ml_collections.FieldReference(0.0, field_type=object)
  c.data.foreground = (
    'above'  # 'above': voxel >= threshold is specimen; 'below': voxel <= threshold.
  )
  # Voxel spacing (per array axis) of an input that carries none (.npy, a zarr/N5 without a spacing
  # attribute, an uncalibrated TIFF); () = none (then 1.0). A file's own spacing is the truth: a
  # value here that disagrees with it is refused, unless data.spacing_override.
  c.data.spacing = ()
  c.data.spacing_override = False  # True: data.spacing replaces a file's (direction, origin kept).
  c.data.cache_chunk = 64  # Edge of the zarr chunks of converted inputs and of the label outputs.
  c.data.builtin = ''  # With no data.path: 'mni152' = the MNI152 T1 template shipped by nilearn.
  c.data.phantom_shape = ()  # With no data.path: generate the built-in phantom of this shape.
  c.data.phantom_seed = 0  # Seed of that phantom (its labels become data.labels).
  c.data.expected_shape = ()  # Paper configs: the shape of the paper's volume (a mismatch is logged).
  # Paper configs: the paper volume's spacing. Used for an input without spacing when data.spacing is
  # unset; a file with its own keeps it (a mismatch is logged): never replaces a scan's header.
  c.data.expected_spacing = ()
  # The working grid (jule3d/working.py): a volume whose largest voxel edge exceeds its smallest by
  # more than this factor is resampled to near-isotropic voxels (0 = never), of edge
  # resample_spacing (0 = the geometric mean of the three: about as many voxels as the input).
  # Labels are written back on the input's grid. Axes thinner than a patch are padded by mirroring.
  c.data.max_anisotropy = 1.5
  c.data.resample_spacing = 0.0

  # --- Patches (method §1) ------------------------------------------------------------------------
  c.patches = ml_collections.ConfigDict()
  c.patches.patch_size = 27  # w: patch edge in voxels (odd, so a patch has a centre voxel).
  c.patches.num_patches = 10_000  # n_s: random training patches with a foreground centre.
  # Extension (not in the paper): replace the air around the specimen in every patch the CNN sees,
  # so segments follow tissue, not the rim (jule3d/specimen.py).
  c.patches.mask_outside = False
  # What masking writes outside: 'mirror' (the specimen mirrored across its surface: a texture keeps
  # its statistics up to the surface) or 'mean' (the specimen's mean: reads as smooth tissue there).
  # Used only with mask_outside; the recommended method sets both.
  c.patches.outside_fill = 'mirror'
  c.patches.outside_block = 4  # Holes narrower than this (voxels) onto the surface stay inside.
  # Where patch centres go, for training and segmentation: 'foreground' (the paper: voxels passing
  # the threshold) or 'specimen' (also the air the specimen encloses: a region segmentation).
  c.patches.domain = 'foreground'

  # --- CNN (method §2) ----------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.conv_features = (50, 50, 50)  # Channels of the three 3D convolutions.
  c.model.kernel_size = 5  # Edge of every convolution kernel (VALID padding, stride 1).
  c.model.pool_size = 2  # Max-pool window and stride after the first convolution.
  c.model.hidden_dim = 1350  # Width of the first dense layer.
  c.model.embed_dim = 160  # Width of the L2-normalised output embedding.
  # What the dense layers see of the last convolution's map: 'flatten' (the paper: every position,
  # in order) or 'mean' (each channel averaged over the map: nearly the same wherever a texture's
  # cells lie in the patch).
  c.model.head = 'flatten'
  # Edge of the patch's central cube fed straight to the dense layers beside the convolutions'
  # output (0 = none, the paper): a path for the intensity at the centre.
  c.model.centre_size = 0
  c.model.init_std = 0.01  # Conv/dense weights ~ N(0, init_std^2), biases 0.
  c.model.bn_momentum = 0.9  # BatchNorm running-average momentum (Flax convention).
  c.model.bn_epsilon = 1e-5  # BatchNorm epsilon.
  # 3D convolutions (jule3d/convolution.py): 'auto' (CPU: oneDNN where built, float32; else
  # im2col. XLA on GPU/TPU), 'xla', 'im2col' or 'onednn'.
  c.model.conv_impl = 'auto'
  c.model.dtype = 'float32'  # Activation/weight compute dtype: 'float32' or 'bfloat16'.
  # Patches per CNN call when features are computed patch by patch: training's clustering of its
  # patches and segmentation's per-patch path. Memory only: a patch's features do not depend on it.
  c.model.feature_batch_size = 256

  # --- Forward pass: GDL agglomerative clustering (method §3) -------------------------------------
  c.cluster = ml_collections.ConfigDict()
  c.cluster.num_clusters = 100  # C (n*): JULE stops merging at this many clusters.
  c.cluster.k_s = 20  # K_s: neighbours in the kNN graph.
  c.cluster.k_c = 5  # K_c: affinities compared in the merge criterion.
  c.cluster.a = 1.0  # sigma^2 = a * mean kNN squared distance.
  c.cluster.lam = 1.0  # lambda: weight of the affinity-gap term in the merge criterion.
  c.cluster.unfolding_rate = 0.9  # eta: merges per period = min(ceil(eta * Nc), Nc - C).
  # What period 0 clusters (jule3d/descriptors.py): 'raw' (the paper: L2-normalised voxels),
  # 'windowed' (Gaussian-windowed voxels, magnitude kept), 'texture' (level + local energy) or
  # 'cue' (the centre level or the pooled fine energy, whichever forms num_segments tighter groups).
  c.cluster.initial_features = 'raw'

  # --- Backward pass: representation learning (method §4) -----------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.epochs_per_period = 20  # CNN epochs after each period's merges.
  c.train.final_period = True  # Moriya: one more training period on the final C labels.
  c.train.batch_size = 100  # Patches per SGD step.
  c.train.num_neg = (
    20  # Negatives per (anchor, positive) pair: min(num_neg, clusters_in_batch - 1).
  )
  c.train.gamma = 2.0  # Weight of the anchor-positive distance in the triplet loss.
  c.train.margin = 0.2  # Triplet margin.
  c.train.learning_rate = 0.01  # Base learning rate.
  c.train.lr_gamma = 1e-4  # Torch 'inv' schedule: lr = base * (1 + lr_gamma * it) ** -lr_power.
  c.train.lr_power = 0.75  # Exponent of the 'inv' schedule.
  c.train.momentum = 0.9  # SGD momentum.
  c.train.weight_decay = 5e-5  # L2 weight decay, added to the gradient of every parameter.
  c.train.anchor_only_grad = False  # Released-Torch variant: gradients through anchors only.
  c.train.dampened_momentum = False  # Released-Torch variant: v = 0.9 v + 0.1 g.
  # 'symmetries': each training patch turned/mirrored by one of the cube's 48 symmetries, drawn
  # per patch and step (jule3d/symmetries.py); 'none' = the paper. Measured and left off (README
  # "Honest reading": with 2-3 epochs per period two demo seeds of three fall apart).
  c.train.augment = 'none'
  c.train.keep_checkpoints = 3  # Checkpoints kept under WORKDIR/checkpoints (older ones pruned).
  # Extension: trainings run at most. When the trained features of the training patches do not
  # hold segment.num_segments distinct groups (jule3d/groups.py) but their period-0 features did,
  # train again from scratch with another seed, up to this many times, and keep the try whose
  # features come closest (lowest ratio; jule3d/train.py). 1 = one training (the paper).
  c.train.tries = 1

  # --- Phase 2: segmentation (method §5) ----------------------------------------------------------
  c.segment = ml_collections.ConfigDict()
  c.segment.stride = 5  # s: grid spacing of patch centres; each label fills the s^3 block.
  c.segment.num_segments = 3  # K: k-means clusters (segment labels 1..K, 0 = not covered).
  c.segment.kmeans_restarts = 10  # k-means++ restarts (best inertia kept).
  c.segment.kmeans_max_fit = 200_000  # Fit k-means on at most this many grid features (seeded).
  c.segment.feature_path = (
    'auto'  # 'auto' (fewer FLOPs), 'dense' (fully convolutional) or 'per_patch'.
  )
  # Potts weight beta of the spatial regularisation of the k-means labels on the grid, in units of
  # the mean k-means distortion (jule3d/regularise.py); 0 = off (the paper).
  c.segment.smoothing = 0.0
  # Which of the CNN's layers k-means reads: 'embedding' (the paper: the L2-normalised output the
  # triplet loss shapes), 'hidden' (the first dense layer's ReLU output, which that output reads) or
  # 'auto' (the recommended method: the embedding where the trained features of the training
  # patches hold K distinct groups, the hidden layer where they do not; segment.reading_layer).
  # The hidden layer's grid features are hidden_dim floats a grid patch instead of embed_dim (4x on
  # the demo and MNI152, 8.4x with the paper's network), which the stride rule below does not count.
  c.segment.layer = 'embedding'
  # Label every voxel of the domain (patches.domain), also within w/2 of the volume's faces, with
  # the label of the nearest grid block (the paper leaves them 0).
  c.segment.fill = False
  # With fill and the 'specimen' domain: the fill also labels the pores open onto the specimen's
  # surface, up to its envelope (a closing of the foreground by a ball of radius
  # patches.outside_block; jule3d/specimen.py); no patch is centred there.
  c.segment.fill_envelope = False
  # What k-means clusters: 'cnn' (the learned features: the method) or, as ablations of the same
  # pipeline, 'intensity' (the centre voxel) or 'initial' (the period-0 descriptor of the patch:
  # 'texture', or 'cue' with the column the rule picks on the grid).
  c.segment.features = 'cnn'
  c.segment.checkpoint = ''  # Another run's workdir or checkpoint dir to segment with ('' = ours).
  c.segment.save_features = False  # Also write the grid features (features.npz) to the workdir.
  # Grid planes per saved feature part (a killed segmentation resumes at the first missing part);
  # 0 = auto: >= 8 patch edges of axis 0 (re-reading the halo per part stays cheap), in whole
  # blocks of the dense path.
  c.segment.part_planes = 0

  # --- Several processes (multi-host; README "GPUs, TPUs and several devices") --------------------
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator = ''  # 'host:port' of process 0, 'auto' (SLURM, TPU pods), '' = one.
  c.distributed.num_processes = 1  # Processes in the run (one per host, usually).
  c.distributed.process_id = 0  # This process: 0 .. num_processes - 1 (0 writes the outputs).

  # --- Evaluation (method §6) ---------------------------------------------------------------------
  c.evaluate = ml_collections.ConfigDict()
  # The baselines segment into config.segment.num_segments classes, as jule3d does.
  c.evaluate.kmeans_max_fit = 200_000  # Intensity k-means baseline fit on this many voxels.
  c.evaluate.kmeans_restarts = 10  # Its k-means++ restarts (best inertia kept).
  c.evaluate.figures = True  # Write PNG slice figures into the report.
  # ANTs Atropos (GMM + MRF) as a third baseline, where .venv-ants has antspyx (jule3d/atropos.py);
  # skipped above this many voxels (ITK holds the whole volume in memory).
  c.evaluate.atropos = True
  c.evaluate.atropos_max_voxels = 64_000_000
  return c


# The recommended method: every extension of the paper's JULE that measured better on the phantom or
# MNI152 and no worse on the other (README "Results"); set by `method`, undone by the ':paper' switch.
# Its grid stride follows the volume's size (a data fact): stride 1, every voxel its own patch, where
# the grid features (an embed_dim float32 row per domain voxel; hidden_dim, 4x at the CPU size, where
# segment.layer 'auto' reads the hidden layer) fit in a few GB, i.e. up to ~10^7 voxels (1.3 / 5 GB;
# configs/demo.py, configs/mni152.py); lung-size scans keep the paper's 5.
RECOMMENDED = {
  'patches.mask_outside': True,
  'patches.outside_fill': 'mirror',
  'patches.domain': 'specimen',
  'cluster.initial_features': 'cue',
  'model.head': 'mean',
  'model.centre_size': 1,
  'train.tries': 3,
  'segment.smoothing': 1.0,
  'segment.fill': True,
  'segment.fill_envelope': True,
  'segment.layer': 'auto',
}


def method(c: ml_collections.ConfigDict, paper: bool) -> ml_collections.ConfigDict:
  """The paper's method as it is (`paper`), or the recommended one (RECOMMENDED on top).

  Args:
    c: a config built on get_config().
    paper: keep the paper's method (every extension off).

  Returns:
    The same ConfigDict, modified in place.
  """
  return c if paper else _set_fields(c, RECOMMENDED)


def _set_fields(c: ml_collections.ConfigDict, fields: dict) -> ml_collections.ConfigDict:
  """`fields` ('group.name' -> value) on top of `c`, in place (returns `c`)."""
  for field, value in fields.items():
    group, name = field.split('.')
    c[group][name] = value
  return c


# The size of network and training the recommended method runs at on a CPU, one setting for the
# demo, MNI152 and a scan of your own (configs/demo.py, mni152.py, scan.py): patches of 17^3 voxels
# (three 3^3 convolutions and one 2x pooling take them to a 3^3 map, as the paper's 5^3 kernels take
# 27^3), 2,000 of them, a narrow CNN, C = 20 final clusters, 2 epochs a period. Measured (README
# "The recommended method"): with the size MNI152 and scan.py had before (15^3 patches, 3,000 of
# them, C = 30, 3 epochs) MNI152 scores the same and the phantom falls apart (0.53-0.71).
CPU_SIZE = {
  'patches.patch_size': 17,
  'patches.num_patches': 2000,
  'model.conv_features': (16, 16, 16),
  'model.kernel_size': 3,
  'model.hidden_dim': 128,
  'model.embed_dim': 32,
  # Narrow layers need a larger init than the paper's N(0, 0.01^2): with 0.01 the embedding before
  # L2 normalisation is tiny, the first SGD steps blow up the last bias and every embedding
  # collapses to one point (loss pinned at the margin), even when training on the true labels.
  'model.init_std': 0.05,
  'cluster.num_clusters': 20,
  'train.epochs_per_period': 2,
}


def cpu_size(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CPU_SIZE on top of `c`, in place (returns `c`)."""
  return _set_fields(c, CPU_SIZE)


def parse_arg(arg: str, allowed: tuple[str, ...]) -> set[str]:
  """The comma-separated words after ':' in `--config=configs/X.py:ARG`, checked.

  Args:
    arg: the text after ':' ('' for none).
    allowed: the words this config knows.

  Returns:
    The set of words.

  Raises:
    ValueError: an unknown word.
  """
  words = {w for w in arg.split(',') if w}
  unknown = sorted(words - set(allowed))
  if unknown:
    raise ValueError(f'config argument {arg!r}: unknown {unknown}; expected words of {allowed}')
  return words


def cpu_variant(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a paper config to a run that finishes in minutes on a 2-core CPU.

  Same method and geometry (27^3 patches, stride-5 grid, K = 3); fewer patches, a narrower CNN, fewer
  epochs. Use it to check a volume and the settings before the paper-size GPU run.

  Args:
    c: a paper config.

  Returns:
    The same ConfigDict, modified in place.
  """
  c.patches.num_patches = 2000
  c.model.conv_features = (16, 16, 16)
  c.model.hidden_dim = 256
  c.model.embed_dim = 64
  c.model.init_std = 0.05  # narrow CNN: see CPU_SIZE (0.01 collapses the embedding)
  c.cluster.num_clusters = min(c.cluster.num_clusters, 50)
  c.train.epochs_per_period = 3
  return c


def paper_experiment(
  arg: str, *, threshold: float, spacing_mm: float, shape: tuple[int, int, int], num_clusters: int
) -> ml_collections.ConfigDict:
  """One of the paper's Table 1 experiments (recommended method unless 'paper'; 'cpu': CPU size).

  Args:
    arg: the text after ':' in `--config=configs/lung_x.py:ARG`: comma-separated words, 'cpu'
      (CPU-size variant) and 'paper' (the paper's method, no extension), e.g. 'cpu,paper'.
    threshold: foreground threshold in the scanner's raw units.
    spacing_mm: isotropic voxel edge in millimetres (data.expected_spacing: a scan's own wins).
    shape: the paper volume's shape (checked against the user's volume, a mismatch is logged).
    num_clusters: C, the cluster count at which JULE stops merging.

  Returns:
    The experiment's config (data.path still to be set by the user).
  """
  c = get_config()
  c.data.threshold = threshold
  c.data.expected_spacing = (spacing_mm,) * 3
  c.data.expected_shape = shape
  c.cluster.num_clusters = num_clusters
  words = parse_arg(arg, ('cpu', 'paper'))
  method(c, paper='paper' in words)
  return cpu_variant(c) if 'cpu' in words else c
