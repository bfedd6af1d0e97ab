"""phi_kernels in other frameworks. Each integration imports its framework only when it is itself
imported, so `import phi_kernels` never pulls them in:

    phi_kernels.integrations.transformers   Hugging Face transformers: attn_implementation="phi_kernels",
                                            apply_phi_kernels_to_phi / apply_phi_kernels_to_llama
"""
