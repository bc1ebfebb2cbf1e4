"""Interactive comparison of DINOv2 and ALiBi-DINOv2 features (`python -m demo.app`)."""
