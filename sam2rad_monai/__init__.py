"""Sam2Rad for MONAI."""
