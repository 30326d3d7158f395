"""Device client: local training, the device loop, and the device's local store."""
