"""Causal traces, attention contributions and knockout, attributions, layer
recommendation and heatmap rendering. Depends only on ``vlm``.
Built by the diagnostics issue on top of ``vlm.patching``.
"""
