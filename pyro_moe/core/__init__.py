"""What runs inside the HF forward: MoE families and their routing rules, the routing context of a
forward pass, handlers, the answer readout and the curvature targets. Imports nothing of the
other sub-packages."""
