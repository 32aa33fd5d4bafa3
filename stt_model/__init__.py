"""STT-UNET model package: networks, data, training, inference, post-processing and metrics
for 3D mitochondria instance segmentation in electron microscopy (DESIGN.md section 6)."""
