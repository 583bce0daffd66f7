"""The interface every backbone implements, as a NamedTuple of pure functions.

`make(config["model"], config["train"])` in each backbone module returns a
`Model`. Params are a pytree (a dict of arrays). `aux` holds static,
non-trainable structure built from the training split (LightGCN's normalised
graph; None for the others). The unlearning stages edit only the user table:
`user_table` takes it out of the params as one (n_users, D) array (for NCF the
GMF and MLP tables concatenated) and `with_user_table` puts a replacement back.
"""

from typing import Any, Callable, NamedTuple


class Model(NamedTuple):
  name: str
  # (key, n_users, n_items) -> params
  init: Callable[..., Any]
  # (train_pairs (k,2) np.int32, n_users, n_items) -> aux pytree or None
  build_aux: Callable[..., Any]
  # (params, aux, users (B,), pos (B,), neg (B, n_neg)) -> scalar training loss
  loss: Callable[..., Any]
  # (params, aux, users (B,), items (B, T) or None) -> scores (B, T) or (B, n_items)
  score: Callable[..., Any]
  # params -> (n_users, D)
  user_table: Callable[..., Any]
  # (params, table (n_users, D)) -> params
  with_user_table: Callable[..., Any]
  # widths of the parts the user table is made of (NCF: GMF, MLP); () = one part
  user_parts: tuple = ()
