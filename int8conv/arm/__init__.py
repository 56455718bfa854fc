"""ncnn's ARM (aarch64) kernels on an x86 host: an arm64 Debian rootfs run under qemu-user."""
