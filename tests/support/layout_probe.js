// Appended to a copy of a report page by tests/support/browser.py. Once the page is laid out it
// measures every visible box and writes JSON into a new pre element, id layout-probe:
//   viewport, scroll_width   the window's width and the page's: a wider page scrolls sideways
//   boxes                    how many boxes were compared
//   overlaps                 pairs of boxes that overlap, neither inside the other (see below)
//   overflows                text that sticks out of the block that holds it
//   search                   with a query: the token search's result rows [token, [feature ids]]
//   after_search             overlaps and overflows again, with the search results shown
// A box is a visible element (an <svg> counts as one box: its drawing is its own business), one
// rectangle per line for inline elements, and each line of text. Two boxes overlap when their
// intersection is more than 1 px both ways (shared table borders are not overlaps).
(function () {
  var SEARCH = __SEARCH__;
  var TOLERANCE = 1;
  var SKIP = { SCRIPT: 1, STYLE: 1, BR: 1, TEMPLATE: 1, COLGROUP: 1, COL: 1, TITLE: 1, HEAD: 1 };

  function name(node) {
    var el = node.nodeType === 1 ? node : node.parentElement;
    var text = (node.textContent || "").trim().slice(0, 40);
    return el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") +
      (el.getAttribute("class") ? "." + el.getAttribute("class").split(" ").join(".") : "") +
      (text ? " \"" + text + "\"" : "");
  }

  function visible(el) {
    return el.checkVisibility({ opacityProperty: true, visibilityProperty: true });
  }

  function collect() {
    var boxes = [];
    function add(node, owner, rects) {
      for (var i = 0; i < rects.length; i++) {
        var r = rects[i];
        if (r.width > 0 && r.height > 0) { boxes.push({ node: node, owner: owner, r: r }); }
      }
    }
    var elements = document.body.querySelectorAll("*");
    for (var i = 0; i < elements.length; i++) {
      var el = elements[i];
      if (SKIP[el.tagName] || el.id === "layout-probe" || !visible(el)) { continue; }
      if (el.closest("svg") && el.tagName.toLowerCase() !== "svg") { continue; }
      add(el, el, el.getClientRects());
    }
    var walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    var range = document.createRange();
    for (var node = walker.nextNode(); node; node = walker.nextNode()) {
      var parent = node.parentElement;
      if (!node.textContent.trim() || SKIP[parent.tagName] || parent.closest("svg") || !visible(parent)) { continue; }
      range.selectNodeContents(node);
      add(node, parent, range.getClientRects());
    }
    return boxes;
  }

  function related(a, b) {
    return a.node.contains(b.node) || b.node.contains(a.node);
  }

  function overlaps(boxes) {
    var sorted = boxes.slice().sort(function (a, b) { return a.r.top - b.r.top; });
    var found = [];
    for (var i = 0; i < sorted.length && found.length < 20; i++) {
      var a = sorted[i];
      for (var j = i + 1; j < sorted.length && sorted[j].r.top < a.r.bottom - TOLERANCE; j++) {
        var b = sorted[j];
        var w = Math.min(a.r.right, b.r.right) - Math.max(a.r.left, b.r.left);
        var h = Math.min(a.r.bottom, b.r.bottom) - Math.max(a.r.top, b.r.top);
        if (w > TOLERANCE && h > TOLERANCE && !related(a, b)) {
          found.push([name(a.node), name(b.node), [Math.round(w), Math.round(h)]]);
          if (found.length >= 20) { break; }
        }
      }
    }
    return found;
  }

  function block(el) {
    while (el && getComputedStyle(el).display.indexOf("inline") === 0) { el = el.parentElement; }
    return el;
  }

  function overflows(boxes) {
    var found = [];
    boxes.forEach(function (box) {
      if (box.node.nodeType !== 3 || found.length >= 20) { return; }
      var holder = block(box.owner).getBoundingClientRect();
      if (box.r.left < holder.left - TOLERANCE || box.r.right > holder.right + TOLERANCE) {
        found.push([name(box.node), name(block(box.owner)), Math.round(box.r.right - holder.right)]);
      }
    });
    return found;
  }

  function report(result) {
    var pre = document.createElement("pre");
    pre.id = "layout-probe";
    pre.textContent = JSON.stringify(result);
    document.body.append(pre);
  }

  function run() {
    var boxes = collect();
    var result = {
      viewport: window.innerWidth, scroll_width: document.documentElement.scrollWidth, boxes: boxes.length,
      overlaps: overlaps(boxes), overflows: overflows(boxes)
    };
    var input = document.getElementById("search-token");
    if (SEARCH !== null && input) {
      input.value = SEARCH;
      input.dispatchEvent(new Event("input", { bubbles: true }));
      result.search = Array.from(document.querySelectorAll("#search-results tr")).map(function (row) {
        return [row.querySelector(".tok").textContent,
                Array.from(row.querySelectorAll("a")).map(function (a) { return Number(a.textContent); })];
      });
      var after = collect();
      result.after_search = { overlaps: overlaps(after), overflows: overflows(after) };
    }
    report(result);
  }

  window.addEventListener("load", function () { document.fonts.ready.then(run); });
})();
