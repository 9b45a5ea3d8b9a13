"""How the package's shipped artefacts are made: training recipes and their tools, beside the package.

Not part of the installed `idefics3` package (which never imports it); run from the repository root, e.g.
`python -m recipes.demo.recipe work/ --seed 0 --install`. Each recipe imports the installed `idefics3`.
"""
