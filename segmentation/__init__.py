"""FAT as a semantic segmentation backbone on segmentation-models-pytorch; see README.md."""
