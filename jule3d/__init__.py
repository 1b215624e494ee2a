"""jule3d: unsupervised segmentation of large 3D images by joint clustering and representation learning."""

__version__ = '0.1.0'
