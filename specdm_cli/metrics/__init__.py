"""Statistics of labelled multispectral datasets (numpy only): distances, divergences, angles."""
