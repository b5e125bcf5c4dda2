"""Interactive protocols on replicated shares (semi-honest, Araki et al. 2016 / ABY3)."""
