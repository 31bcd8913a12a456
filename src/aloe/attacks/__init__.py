"""Privacy attacks on AloePri artifacts (section 4 of the design notes), all scored the same way.

The attacker is the honest-but-curious server: it holds the plain public model, the whole obfuscated checkpoint and
the obfuscated token ids it receives. The secret is read only by :mod:`aloe.attacks.scoring` to score a guess.
"""
