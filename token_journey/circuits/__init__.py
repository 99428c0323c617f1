"""Circuits: the local replacement model of a prompt and its attribution graph (Ameisen et al. 2025).

`replacement` freezes the clean pass's attention patterns and norm scales and swaps each MLP for
its transcoder plus an error node; `graph` computes every direct effect with batched backward
passes, prunes by influence and scores the graph; `verify` checks it against the model.
"""
