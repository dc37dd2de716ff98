"""Tests that build the image and run the compose stack with a real container engine."""
