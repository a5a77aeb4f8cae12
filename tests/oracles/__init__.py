"""Reference re-implementations the tests compare minip2p against (test-only; they share no code
with minip2p and run on diffusers' / transformers' modules):

    p2p_oracle       the official Prompt-to-Prompt controllers (google/prompt-to-prompt)
    masactrl_oracle  the official MasaCtrl (TencentARC/MasaCtrl)
    pnp_oracle       the official plug-and-play (MichalGeyer/pnp-diffusers)
    compvis          a diffusers pipeline written as an original CompVis single-file state dict

Imported as `from oracles import p2p_oracle`, as `helpers` is: pytest puts tests/ on sys.path
(the folder of conftest.py, a folder with no __init__.py).
"""
