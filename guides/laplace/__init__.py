"""The Laplace families: dense Laplace over small site sets, Kronecker-factored curvature, posterior
and guide (``kron-laplace``, ``expert-laplace``), prior-precision selection and the linearised predictive."""
