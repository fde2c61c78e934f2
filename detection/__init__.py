"""FAT as a detection backbone on torchvision's RetinaNet and Mask R-CNN; see README.md."""
