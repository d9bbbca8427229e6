/* The search ranking of these docs: Sphinx's default scores plus one rule.
 *
 * A reader who searches for "merge" or "save adapter" wants the package-level
 * function (flora.merge, flora.save_adapter). With the default scores it ties
 * with every method of that name (flora.Linear.merge, ...) and loses the tie
 * alphabetically, and a name matched in part ("save adapter") ranks below page
 * text. So an object result gains PUBLIC_BOOST when its full name has two
 * parts (a package and a name), and loses one point per further part.
 *
 * docs/_ext/site_checks.py (search_ranking) ranks the built index the same way
 * and fails the build when a name of site_checks_search is not found first.
 */
const PUBLIC_BOOST = 20;

var Scorer = {
  score: (result) => {
    const [, title, , , score, , kind] = result;
    if (kind !== "object") return score;
    const depth = title.split(".").length;
    return depth <= 2 ? score + PUBLIC_BOOST : score - (depth - 2);
  },

  // Sphinx's defaults (sphinx/themes/basic/static/searchtools.js).
  objNameMatch: 11,
  objPartialMatch: 6,
  objPrio: {
    0: 15,
    1: 5,
    2: -5,
  },
  objPrioDefault: 0,
  title: 15,
  partialTitle: 7,
  term: 5,
  partialTerm: 2,
};
