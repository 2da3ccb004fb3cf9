# Included after each project() of the vendored llama.cpp (CMAKE_PROJECT_INCLUDE,
# see tests/llama_server.py). The tests serve tiny models, so only ggml's
# kernels are worth -O3; libllama, the server, its JSON and HTTP code and the
# multimodal library are mostly front-end work for the compiler and build in
# about two thirds of the time at -O1 (5:04 -> 3:42 for the whole build on
# 2 cores). Applied once the whole tree is configured: the targets exist then.
get_property(_kvern_deferred GLOBAL PROPERTY KVERN_LIGHT_OPT_DEFERRED)
if(NOT _kvern_deferred)
  set_property(GLOBAL PROPERTY KVERN_LIGHT_OPT_DEFERRED TRUE)
  function(_kvern_light_opt)
    foreach(target IN ITEMS llama llama-common mtmd server-context llama-server-impl
                            llama-server cpp-httplib)
      if(TARGET ${target})
        target_compile_options(${target} PRIVATE -O1)
      endif()
    endforeach()
  endfunction()
  cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL _kvern_light_opt)
endif()
