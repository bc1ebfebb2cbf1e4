"""alibi-dinov2's library: everything the scripts, the measurements and the demo build on.

Subpackages, bottom to top (imports point only downward; see the README's "Project layout"): `errors`, `names`,
`synthetic` < `io` < `cli` < `features` < `hub` < `segmentation`, `conversion` < `training` < `commands`.
The models themselves (`modeling_alibi_dinov2`, `modeling_alibi_dinov3`, `alibi_attention`) sit below the library, as
self-contained files copied into every saved model folder.
"""
