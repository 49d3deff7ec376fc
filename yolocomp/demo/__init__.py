"""yolocomp.demo"""
