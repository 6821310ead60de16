"""TPU pod tooling: `tpu.sh` (gcloud TPU VMs and queued resources), `launch` (gin sweeps as work
units, local or on TPU VMs), `aot_compile` / `aot_all.sh` (compile a step for a TPU topology on a
CPU host and report whether it fits), `topology` (TPU generations as data). See docs/tpu.md."""
