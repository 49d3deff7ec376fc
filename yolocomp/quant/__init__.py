"""yolocomp.quant"""
