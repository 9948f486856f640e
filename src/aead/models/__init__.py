"""Models: pure torch modules (autoencoders, backbones, memory banks, the discriminator) and the anomaly maps."""
