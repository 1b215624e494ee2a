"""The workdir's layout: the one place that names every output and folder of a run.

.jule3d.lock          LOCK: held by the run using the workdir (jule3d/lock.py)
phantom/              PHANTOM: the built-in phantom, when the config asks for it (no data.path)
mni152/               MNI152: the labels of the built-in MNI152 template (jule3d/datasets.py)
cache/                CACHE: non-chunked inputs converted once to chunked zarr; derived copies
checkpoints/          CHECKPOINTS: orbax checkpoints of phase 1 (jule3d/checkpoint.py)
damaged_checkpoints/  DAMAGED_CHECKPOINTS: checkpoints that could not be restored, set aside (never deleted)
tries/<t>/            TRIES: the further trainings of train.tries, each a workdir of its own (checkpoints/,
                      train_history.json); the kept one is copied into checkpoints/ (jule3d/train.py)
train_history.json    HISTORY: one entry per JULE period
segmentation.zarr     SEGMENTATION: uint8 labels, the input's shape and geometry; the same labels
                      as SEGMENTATION_NIFTI (.nii.gz) and SEGMENTATION_NRRD (.nrrd, 3D Slicer)
features.npz          FEATURES: the grid features, with segment.save_features
baselines/            BASELINES: the intensity and Atropos baselines' label volumes
timings.json          TIMINGS: seconds per stage
report.json, report.md, figures/   REPORT_JSON, REPORT_MD, FIGURES
"""

LOCK = '.jule3d.lock'
PHANTOM = 'phantom'
MNI152 = 'mni152'
CACHE = 'cache'
CHECKPOINTS = 'checkpoints'
DAMAGED_CHECKPOINTS = 'damaged_checkpoints'
TRIES = 'tries'
HISTORY = 'train_history.json'
SEGMENTATION = 'segmentation.zarr'
SEGMENTATION_NIFTI = 'segmentation.nii.gz'
SEGMENTATION_NRRD = 'segmentation.nrrd'  # 3D Slicer loads it as a labelmap
FEATURES = 'features.npz'
SEGMENT_PROGRESS = '.segment_progress'  # feature parts of an unfinished segmentation
BASELINES = 'baselines'
TIMINGS = 'timings.json'
REPORT_JSON = 'report.json'
REPORT_MD = 'report.md'
FIGURES = 'figures'
