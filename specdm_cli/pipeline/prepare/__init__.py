"""prepare: raw dataset in, canonical store out (filters, normalisation statistics, resume)."""
