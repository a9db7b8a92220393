"""vhost-user back-end (the device side): qemu shares the guest's memory and the frames move through virtio
rings. `protocol` frames the messages, `device` applies them, `memory` maps the guest's memory, `virtqueue`
walks the rings, `net` moves frames, and `backend` is the `TapBackend` the dataplane drives."""
