"""Experiments that reproduce figures of the ResNet paper on MNIST."""
