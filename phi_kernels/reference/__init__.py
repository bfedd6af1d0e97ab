"""Pure-PyTorch references of every op: the oracles the kernels are tested against, and the
`ref` backend. Written for clarity, not speed; they work in any dtype, fp64 included."""
from phi_kernels.reference.adam import adam_step_ref
from phi_kernels.reference.flash_attn import dropout_keep_mask, flash_attn_ref
from phi_kernels.reference.rotary import apply_rotary_ref, rotary_positions

__all__ = ["adam_step_ref", "dropout_keep_mask", "flash_attn_ref", "apply_rotary_ref", "rotary_positions"]
