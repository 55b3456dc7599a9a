"""Steps 5 and 6: the evaluated model shipped, and the test table scored with what was shipped.

- ``scorer_folder``: step 5, a scorer folder that stands alone (programs, the scoring package, provenance);
- ``score_test_table``: step 6, ``dataset.test_dataframe`` scored with that folder's own code.
"""
