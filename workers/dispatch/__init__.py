"""The data plane: moving tokens to the ranks that hold their experts.

One interface, the Megatron-Core shape: every direction of a dispatch is a local
*preprocess*, one *communicate* step (a collective: "all ranks must call this", in the
same order) and a local *postprocess*; the local phases never communicate. One module
per layout implements it:

- ``disaggregated``: front-end -> expert ranks -> front-end, one all-to-all each way,
  fixed capacity instead of split-size metadata (``disaggregated.py``);
- ``coherent``: a token moves only to where its experts are and stays there
  (ExFlow; ``coherent.py``).

Shared by both: the wire format (``wire.py``), the expert compute of received rows
(``compute.py``), and the collectives, counted at the call (``collectives.py``), over
torch.distributed or the same-node transport (``local_transport.py``).
"""
